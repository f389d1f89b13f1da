"""The benchmark's summary and plots, on synthetic records (no model run)."""

import pytest
import torch

from jetspec_compile.bench import markdown, plot, summarize


def records():
    out = []
    for prompt in range(3):
        for method, tps in (("hf", 10.0), ("jetspec-b8", 15.0 + prompt)):
            rec = {"set": "s", "prompt": prompt, "method": method, "seconds": 2.0, "new_tokens": 20,
                   "tokens_per_second": tps, "identical": True, "warmup": prompt == 0, "rss_mb": 100.0}
            if method != "hf":
                rec.update(tau=2.0, histogram={"1": 3, "3": 3}, trace=[(0.1, 1), (0.5, 4)], draft_seconds=0.1,
                           verify_seconds=1.5)
            out.append(rec)
    return out


def test_summary_ratios_skip_warmup_and_plots_are_written(tmp_path):
    methods = ["hf", "jetspec-b8"]
    summary = summarize(records(), methods)
    entry = summary["s"]["jetspec-b8"]
    assert entry["speedup_min"] == 1.6 and entry["speedup_max"] == 1.7  # prompt 0 (warm-up) excluded
    assert entry["tau"] == 2.0 and entry["histogram"] == {1: 6, 3: 6}  # two counted prompts, summed
    assert "| s | jetspec-b8 |" in markdown(summary, methods)
    paths = plot({"summary": summary, "methods": methods, "records": records()}, tmp_path)
    assert len(paths) == 5 and all(p.stat().st_size > 1000 for p in paths)
    assert paths[0].name == "engines_per_set.png"


def test_sampled_rows_are_compared_with_hf_sampling():
    import argparse

    import pytest

    from jetspec_compile.bench import parse_sample

    out = []
    for prompt in range(3):
        for method, tps in (("hf", 10.0), ("jetspec-b8", 20.0), ("hf-sample", 5.0), ("jetspec-b8-sample", 9.0)):
            rec = {"set": "s", "prompt": prompt, "method": method, "seconds": 2.0, "new_tokens": 20,
                   "tokens_per_second": tps, "identical": None if method.endswith("-sample") else True,
                   "warmup": prompt == 0, "rss_mb": 100.0}
            if method.startswith("jetspec"):
                rec.update(tau=2.0, histogram={"2": 3}, draft_seconds=0.1, verify_seconds=1.5)
            out.append(rec)
    methods = ["hf", "jetspec-b8", "hf-sample", "jetspec-b8-sample"]
    summary = summarize(out, methods)
    assert summary["s"]["jetspec-b8"]["speedup_median"] == 2.0
    assert summary["s"]["jetspec-b8-sample"]["speedup_median"] == 1.8  # 9 / 5, not 9 / 10
    assert "| s | jetspec-b8-sample |" in markdown(summary, methods) and "n/a" in markdown(summary, methods)
    assert parse_sample("0.7,0.9") == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert parse_sample("1")["top_p"] is None
    for bad in ("0", "0.7,1.5", "hot"):
        with pytest.raises(argparse.ArgumentTypeError, match="--sample takes"):
            parse_sample(bad)


def test_lm_head_report_says_where_each_spec_took_its_argmax():
    import pytest
    import torch

    import jetspec_compile as js
    from jetspec_compile.bench import lm_head_report
    from jetspec_compile.drafter import NGramDrafter
    from jetspec_compile.kernels import cpu_linear
    from tests.families import VOCAB, make_model

    if not cpu_linear.bf16_supported():
        pytest.skip("this PyTorch build has no oneDNN bf16 GEMM")
    model = make_model("llama")
    specs = {name: js.optimize(model, drafter=NGramDrafter(), budget=4, max_cache_len=64, lm_head=setting)
             for name, setting in (("certified", "certified"), ("exact", "exact"))}
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    for spec in specs.values():
        spec.generate(ids, max_new_tokens=8)
    data, text = lm_head_report(specs)
    assert data["certified"]["budgets"] == {"1": "certified", "4": "certified"}
    assert data["certified"]["candidates_per_row"] >= 1 and data["certified"]["fallback_rows"] == 0
    assert data["exact"] == {"budgets": {"1": "fp32 in the graph", "4": "fp32 in the graph"},
                             "candidates_per_row": None, "fallback_rows": 0}
    assert "certified: budget 1 certified, budget 4 certified;" in text and "exact: budget 1 fp32" in text


def test_drafter_dtype_report_says_what_each_drafter_computed_in():
    import jetspec_compile as js
    from jetspec_compile.bench import drafter_dtype_report
    from jetspec_compile.drafter import DrafterConfig, JetSpecDrafter, NGramDrafter, ParallelDrafter
    from jetspec_compile.kernels import cpu_linear
    from tests.families import make_model

    model = make_model("llama")
    cfg = DrafterConfig.for_target(model.config, (0, 1), num_layers=1, block_size=4)
    net = ParallelDrafter(cfg, model.get_input_embeddings(), model.get_output_embeddings())
    specs = {"fp32": js.optimize(model, drafter=JetSpecDrafter(net), budget=4, max_cache_len=64,
                                 drafter_dtype="float32"),
             "ngram": js.optimize(model, drafter=NGramDrafter(), budget=4, max_cache_len=64)}
    if cpu_linear.bf16_supported():
        specs["bf16"] = js.optimize(model, drafter=JetSpecDrafter(net), budget=4, max_cache_len=64,
                                    drafter_dtype="bfloat16")
    data, text = drafter_dtype_report(specs)
    assert data == {"fp32": "float32", **({"bf16": "bfloat16"} if "bf16" in specs else {})}
    assert text.startswith("Drafter network computed in: fp32 float32")
    assert drafter_dtype_report({"ngram": specs["ngram"]}) == ({}, "")


def test_weight_form_report_says_how_each_spec_reads_the_layer_weights():
    import jetspec_compile as js
    from jetspec_compile.bench import weight_form_report
    from jetspec_compile.drafter import NGramDrafter
    from jetspec_compile.kernels import compact_linear
    from tests.families import make_model, with_exact_weights

    model = with_exact_weights(make_model("llama"), "q4")
    specs = {"auto": js.optimize(model, drafter=NGramDrafter(), budget=4, max_cache_len=64),
             "off": js.optimize(model, drafter=NGramDrafter(), budget=4, max_cache_len=64, compact_weights="off")}
    data, text = weight_form_report(model, specs)
    layers = sum(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    fp32_mb = sum(m.weight.numel() * 4 for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)) / 1e6
    assert data["off"] == {"forms": {"fp32": layers}, "mb": pytest.approx(fp32_mb)}
    if compact_linear.kernels_available():
        assert data["auto"]["forms"] == {"q4": layers} and data["auto"]["mb"] == pytest.approx(fp32_mb * 0.1875)
        assert text.startswith(f"Layer weights read per decoding step: auto q4 x{layers}")
