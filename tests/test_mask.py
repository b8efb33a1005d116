"""ActiveMask pins SparK's masking: kept-patch counts, strides, coordinates, neighbour tables."""
import pytest
import torch

from spark_sparse import ActiveMask


@pytest.mark.parametrize("grid_hw,ratio", [((7, 7), 0.6), ((7, 7), 0.75), ((4, 4), 0.6), ((3, 5), 0.6),
                                           ((2, 2), 0.5), ((6, 8), 0.9)])
def test_kept_patches_per_image_is_sparks_round(grid_hw, ratio):
    mask = ActiveMask.random(5, grid_hw, ratio)
    expected = round(grid_hw[0] * grid_hw[1] * (1 - ratio))
    assert mask.active.flatten(1).sum(1).tolist() == [expected] * 5


def test_generator_makes_masks_reproducible():
    a = ActiveMask.random(3, (7, 7), 0.6, generator=torch.Generator().manual_seed(3))
    b = ActiveMask.random(3, (7, 7), 0.6, generator=torch.Generator().manual_seed(3))
    c = ActiveMask.random(3, (7, 7), 0.6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.active, b.active) and not torch.equal(a.active, c.active)


@pytest.mark.parametrize("ratio", [1.0, 0.99, -0.1])
def test_ratio_that_hides_everything_is_refused(ratio):
    with pytest.raises(ValueError, match="mask ratio"):
        ActiveMask.random(1, (2, 2), ratio)


@pytest.mark.parametrize("grid_hw, ratio", [((2, 3), 0.01), ((7, 7), 0.01), ((3, 3), 0.05)])
def test_ratio_that_hides_something_but_rounds_to_keeping_every_patch_is_refused(grid_hw, ratio):
    with pytest.raises(ValueError, match="nothing is left to reconstruct"):
        ActiveMask.random(1, grid_hw, ratio)


def test_dense_at_upsamples_by_whole_patches():
    active = torch.tensor([[[[True, False], [False, True]]]])
    mask = ActiveMask(active, downsample_ratio=32)
    dense = mask.dense_at(8)
    assert dense.shape == (1, 1, 8, 8)
    assert dense[0, 0, :4, :4].all() and not dense[0, 0, :4, 4:].any() and dense[0, 0, 4:, 4:].all()
    assert mask.dense_at(32) is mask.dense_at(32)   # cached


def test_non_square_grid_and_coordinates_are_row_major():
    mask = ActiveMask.random(2, (3, 5), 0.6, generator=torch.Generator().manual_seed(0))
    coords = mask.coords_at(16)
    dense = mask.dense_at(16)
    assert dense.shape == (2, 1, 6, 10)
    assert coords.shape == (int(dense.sum()), 3) and coords.is_contiguous()
    flat = coords[:, 0] * 60 + coords[:, 1] * 10 + coords[:, 2]
    assert torch.all(flat[1:] > flat[:-1])
    assert dense[coords[:, 0], 0, coords[:, 1], coords[:, 2]].all()


def test_index_grid_points_to_rows_and_marks_masked_sites():
    mask = ActiveMask.random(2, (2, 3), 0.5, generator=torch.Generator().manual_seed(1))
    grid = mask.index_grid(16)
    n = mask.num_active(16)
    coords = mask.coords_at(16)
    assert torch.equal(grid[coords[:, 0], coords[:, 1], coords[:, 2]], torch.arange(n))
    assert (grid[~mask.dense_at(16)[:, 0]] == n).all()


def test_neighbour_table_marks_masked_and_padding_taps():
    active = torch.tensor([[[[True, False]]]])                     # one visible patch of two
    mask = ActiveMask(active, downsample_ratio=32)
    table = mask.neighbour_table(16, 16, (3, 3), (1, 1), (1, 1))   # 2x4 map at stride 16
    n_in = mask.num_active(16)
    assert table.shape == (n_in, 9)
    # site (0, 1): right neighbour (0, 2) is masked, top row is padding
    row = int(mask.index_grid(16)[0, 0, 1])
    taps = table[row].view(3, 3)
    assert (taps[0] == n_in + 1).all()
    assert taps[1, 2] == n_in and taps[1, 1] == row and taps[1, 0] == int(mask.index_grid(16)[0, 0, 0])


def test_check_matches_rejects_wrong_shapes():
    mask = ActiveMask.random(2, (2, 2), 0.5)
    with pytest.raises(ValueError, match="shape"):
        mask.check_matches(torch.zeros(2, 3, 96, 64))
    with pytest.raises(ValueError, match=r"\(B, 1, h, w\)"):
        ActiveMask(torch.ones(2, 2, 2, 2, dtype=torch.bool))
    hidden = ActiveMask(torch.zeros(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="visible patch"):
        hidden.check_matches(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_a_mask_given_as_a_transposed_view_trains_as_its_contiguous_copy(backend):
    """A transposed bool tensor is a valid mask; the loss's ``view`` of it failed on every backend."""
    import spark_sparse as ss

    torch.manual_seed(0)
    spark = ss.create_spark("tiny_cnn", backend=backend, input_size=64)
    images = torch.randn(2, 3, 64, 64)
    grid = torch.tensor([[[[1, 0], [0, 1]]], [[[1, 1], [0, 0]]]], dtype=torch.bool).transpose(2, 3)
    torch.manual_seed(1)
    from_view = spark(images, ActiveMask(grid))
    torch.manual_seed(1)
    from_copy = spark(images, ActiveMask(grid.contiguous()))
    assert torch.equal(from_view, from_copy)
