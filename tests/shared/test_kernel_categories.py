"""benchmarks/kernel_categories.py: the kernel names of real 16K-step profiles (H100, torch 2.11, session 15) land in
the categories a reader expects, CUPTI's non-kernel records count nowhere, and the totals add up."""

import pytest

from benchmarks.kernel_categories import category, format_summary, summarise

# (kernel name as torch.profiler lists it, expected category): names from session 15's profiles
NAMES = [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x64x128_4x1x1_cga1x1x1_kernel0_0",
     "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false>>", "attention"),
    ("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(...)", "attention"),
    ("_hopper_gemm_kernel", "experts"),
    ("_grouped_gemm_tn_kernel", "experts"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "dense_gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_64x64_16x6_tn_align4>(...)", "dense_gemm"),
    ("sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize128x128x32_warpgroupsize1x1x1", "dense_gemm"),
    ("_cross_entropy_rows_kernel", "loss"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>(...)", "routing"),
    ("triton_poi_fused__to_copy__unsafe_view_add_mul_2", "inductor_fused"),
    ("void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float, at::native::func_wrapper_t>>", "reductions"),
    ("void at::native::vectorized_gather_kernel<16, long>(...)", "gather_scatter"),
    ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast>", "elementwise"),
    ("some_new_kernel_nobody_named", "other"),
]


@pytest.mark.parametrize("name,expected", NAMES)
def test_category_of_profiled_kernels(name, expected):
    assert category(name) == expected


def test_summary_totals_shares_and_other():
    rows = [("_hopper_gemm_kernel", 200.0, 264), ("_grouped_gemm_tn_kernel", 50.0, 96),
            ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 150.0, 24), ("mystery", 100.0, 3),
            ("Command Buffer Full", 90.0, 800)]
    s = summarise(rows)
    assert s["total_ms"] == pytest.approx(500.0)  # CUPTI's "Command Buffer Full" is no kernel
    cats = s["categories"]
    assert list(cats) == ["experts", "attention", "other"]  # largest first
    assert cats["experts"]["ms"] == pytest.approx(250.0) and cats["experts"]["calls"] == 360
    assert cats["experts"]["share"] == pytest.approx(0.5)
    assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0)
    assert s["other_top"] == [{"kernel": "mystery", "ms": 100.0, "calls": 3}]
    text = format_summary(s)
    assert "experts" in text and "50.0%" in text and "mystery" in text


def test_empty_profile():
    s = summarise([])
    assert s["total_ms"] == 0 and s["categories"] == {} and s["other_top"] == []
