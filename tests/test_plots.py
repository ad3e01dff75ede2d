import matplotlib
import pandas as pd
import pytest

from colquant.evaluate import plots, sweep

matplotlib.use("Agg")

W4 = {seqlen: f"w4a16-g128-sym-pile10k-seqlen{seqlen}-iters200" for seqlen in (256, 512, 1024)}
RTN = "w4a16-g128-sym-rtn"


W4A8 = "w4a8-g128-sym-pile10k-seqlen1024-iters200"  # the seqlen-1024 checkpoint run as W4A8


def test_variants_are_ordered_bf16_then_seqlen_numerically_then_baselines_fp8_w4a8_and_unknown_kinds():
    names = ["mystery-q3", W4A8, "fp8-lm", RTN, W4[1024], "bf16", W4[256], W4[512], "fp8-all"]
    assert plots.variant_order(names) == ["bf16", W4[256], W4[512], W4[1024], RTN, "fp8-all", "fp8-lm", W4A8,
                                          "mystery-q3"]
    assert [plots.variant_precision(name) for name in ("bf16", RTN, "fp8-lm", W4A8)] == ["BF16", "W4A16", "FP8", "W4A8"]


def test_a_w4a8_run_has_a_hue_of_its_own_and_leaves_the_auto_round_shades_as_they_were():
    without = plots.variant_palette(["bf16", *W4.values(), RTN])
    with_w4a8 = plots.variant_palette(["bf16", *W4.values(), RTN, W4A8])
    assert {name: with_w4a8[name] for name in without} == without and with_w4a8[W4A8] not in without.values()


def test_a_variant_keeps_its_colour_whatever_else_a_figure_shows():
    everything = plots.variant_palette(["bf16", *W4.values(), RTN, "fp8-lm"])
    assert len(set(everything.values())) == len(everything)
    shown = plots.hue_style([RTN, W4[512]], everything)
    assert shown["hue_order"] == [W4[512], RTN]
    assert shown["palette"] == {W4[512]: everything[W4[512]], RTN: everything[RTN]}
    with pytest.raises(ValueError, match="no colour for"):
        plots.hue_style(["fp8-all"], everything)


def sweep_rows(peaks_mib):
    return pd.DataFrame([{"variant": variant, "kind": "page", "batch_size": batch, "status": "ok", "items_per_s": 1.0 * batch,
                          "peak_memory_mib": peak * batch} for variant, peak in peaks_mib.items() for batch in (1, 2, 4)])


def test_the_memory_plot_scales_to_the_data_not_to_the_largest_budget():
    results = sweep_rows({"bf16": 100, RTN: 40})  # at most 400 MiB
    palette = plots.variant_palette(["bf16", RTN])
    ax = sweep.plot_memory(results, [8, 12, 80], palette=palette).axes[0]
    assert ax.get_ylim()[1] < 1  # GiB: no budget line stretches the axis
    assert "all peaks below the smallest budget (8 GB)" in [text.get_text() for text in ax.texts]
    lines = {line.get_label(): line.get_color() for line in ax.get_legend().get_lines()}
    assert matplotlib.colors.to_rgb(lines[RTN]) == pytest.approx(matplotlib.colors.to_rgb(palette[RTN]))
    big = sweep.plot_memory(sweep_rows({"bf16": 4096}), [8, 12, 80]).axes[0]  # up to 16 GiB: 8 and 12 drawn
    assert sorted(text.get_text() for text in big.texts) == ["12 GB", "8 GB"]


def test_random_weights_plots_carry_the_note():
    figure = sweep.plot_throughput(sweep_rows({"bf16": 100}))
    assert plots.RANDOM_WEIGHTS_NOTE not in [text.get_text() for text in figure.texts]
    plots.mark_random_weights(figure, random_weights=True)
    assert plots.RANDOM_WEIGHTS_NOTE in [text.get_text() for text in figure.texts]
