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


# ---- older profiles' text tables -------------------------------------------------------------------------------------

def _row(name: str, *cols: str) -> str:
    """One row laid out as torch.profiler's table: the name right-aligned in 55 columns, then 10 cells of 12."""
    return f"{name:>55}  " + "  ".join(f"{c:>12}" for c in cols) + "  "


RULE = "-" * 55 + "  " + "  ".join("-" * 12 for _ in range(10)) + "  "
TABLE = "\n".join([
    "S=16384: wall 849.4 ms under the profiler; device busy 834.8 ms (sum of kernel times)",
    "",
    RULE,
    _row("Name", "Self CPU %", "Self CPU", "CPU total %", "CPU total", "CPU time avg", "Self CUDA", "Self CUDA %",
         "CUDA total", "CUDA time avg", "# of Calls"),
    RULE,
    # an operator (host time: its kernels are counted on their own rows), then kernels, an annotation's GPU range
    _row("aten::_cudnn_attention_backward", "0.23%", "2.660ms", "0.50%", "5.701ms", "237.559us", "239.919ms",
         "28.74%", "239.919ms", "9.997ms", "24"),
    _row("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wg...", "0.00%", "0.000us", "0.00%", "0.000us",
         "0.000us", "229.439ms", "27.48%", "229.439ms", "9.560ms", "24"),
    _row("_hopper_gemm_kernel", "0.00%", "0.000us", "0.00%", "0.000us", "0.000us", "200.885ms", "24.06%",
         "200.885ms", "760.928us", "264"),
    _row("## Call CompiledFxGraph fflup45z6fjgj67dsqxilwchcpi2...", "0.00%", "0.000us", "0.00%", "0.000us",
         "0.000us", "150.062ms", "17.98%", "150.062ms", "3.126ms", "48"),
    _row("Optimizer.step#AdamW.step", "0.00%", "0.000us", "0.00%", "0.000us", "0.000us", "20.294ms", "2.43%",
         "20.294ms", "70.465us", "288"),
    _row("triton_poi_fused_add_1", "0.00%", "0.000us", "0.00%", "0.000us", "0.000us", "512.000us", "0.06%",
         "512.000us", "10.667us", "48"),
    RULE,
    "Self CPU time total: 1.134s",
])


def test_kernel_rows_of_an_older_profiles_text():
    from benchmarks.kernel_categories import kernels_from_table

    rows, busy = kernels_from_table(TABLE)
    assert busy == pytest.approx(834.8)
    # kernels only: not the operator (host time), not the GPU ranges of annotations
    assert rows == [("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wg...", pytest.approx(229.439), 24),
                    ("_hopper_gemm_kernel", pytest.approx(200.885), 264),
                    ("triton_poi_fused_add_1", pytest.approx(0.512), 48)]


def test_command_prints_totals_and_plots(tmp_path, capsys):
    import json

    from benchmarks.kernel_categories import main

    txt = tmp_path / "old_profile.txt"
    txt.write_text(TABLE + "\n")
    js = tmp_path / "new.kernels.json"
    js.write_text(json.dumps({"total_ms": 30.0, "kernels": [["_hopper_gemm_kernel", 20.0, 4],
                                                          ["cudnn_generated_fprop", 10.0, 2]]}))
    png = tmp_path / "breakdown.png"
    assert main([str(txt), str(js), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "old_profile" in out and "new" in out
    assert "cover 52% of the profile's 834.8 ms" in out  # 430.8 of 834.8 ms in the table's kernel rows
    assert png.stat().st_size > 0


def test_command_refuses_what_is_no_profile(tmp_path):
    from benchmarks.kernel_categories import main

    bad = tmp_path / "notes.txt"
    bad.write_text("no table here\n")
    with pytest.raises(SystemExit) as e:
        main([str(bad)])
    assert e.value.code == 2
