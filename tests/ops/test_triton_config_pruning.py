"""kernels/sparsekit_kernels/_config.prune_oversized: the autotuned kernels compile and time only the
Hopper configs whose tiles fit the problem (a tiny GEMM took 50-109 s on an H200 tuning all eight),
every config when the problem is training-sized, and never none."""
import pytest
import triton

from sparsekit.kernels import gemm, sparse
from sparsekit.kernels._config import prune_oversized


def hopper(entries: list[dict]) -> list:
    """The GPU config list of a kernel (the interpreter's autotuners hold one small config instead)."""
    return [triton.Config({k: v for k, v in entry.items() if not k.startswith("num_")}) for entry in entries]


def tiles(configs, *blocks):
    return sorted(tuple(c.kwargs[b] for b in blocks) for c in configs)


def test_a_tiny_gemm_keeps_only_the_smallest_tile():
    kept = prune_oversized(BLOCK_M="M", BLOCK_N="N")(hopper(gemm._HOPPER), {"M": 13, "N": 29, "K": 11})
    assert tiles(kept, "BLOCK_M", "BLOCK_N") == [(64, 64)]


def test_a_training_sized_gemm_keeps_every_config():
    configs = hopper(gemm._HOPPER)
    kept = prune_oversized(BLOCK_M="M", BLOCK_N="N")(configs, {"M": 4096, "N": 32768, "K": 768})
    assert kept == configs


def test_tiles_may_reach_the_next_power_of_two_of_the_size():
    kept = prune_oversized(BLOCK_M="M", BLOCK_N="N")(hopper(gemm._HOPPER), {"M": 100, "N": 300, "K": 64})
    assert tiles(kept, "BLOCK_M", "BLOCK_N") == [(64, 64), (64, 128), (64, 256), (128, 64), (128, 128),
                                                  (128, 128), (128, 256)]


@pytest.mark.parametrize("sizes", [{"S": 3, "D": 11}, {"S": 1, "D": 1}, {"S": 0, "D": 0}])
def test_when_no_config_fits_the_smallest_tile_stays(sizes):
    configs = hopper(sparse._SEGMENT_HOPPER)
    kept = prune_oversized(BLOCK_S="S", BLOCK_D="D")(configs, sizes)
    assert len(kept) == 1
    assert kept[0].kwargs["BLOCK_S"] * kept[0].kwargs["BLOCK_D"] == min(
        c.kwargs["BLOCK_S"] * c.kwargs["BLOCK_D"] for c in configs)


@pytest.mark.parametrize("kernel", [gemm._gemm_kernel, sparse._segment_sum_kernel, sparse._scatter_add_kernel],
                         ids=lambda k: k.base_fn.__name__ if hasattr(k, "base_fn") else str(k))
def test_every_autotuned_kernel_prunes(kernel):
    assert kernel.early_config_prune is not None
