"""bench/roofline.py: the counts against hand computations, the kernels' counts against their
docstrings, kernel >= minimum everywhere, the GPU names, the Markdown section of docs/kernels.md
and the command that writes it. Pure arithmetic: about a second."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import roofline  # noqa: E402
import targets  # noqa: E402

H100, A100 = roofline.GPUS["H100"], roofline.GPUS["A100"]


def test_infonce_terms_minimum_by_hand():
    B = 128  # bf16: 2 bytes per entry; 4 fp32 (B,) outputs forward, 4 fp32 upstream gradients backward
    m = roofline.minimum("infonce_terms", B, None, "bf16")
    assert m["fwd"].bytes == 128 * 128 * 2 + 4 * 4 * 128 == 34_816
    assert m["fwd"].exp == 2 * 128 * 128 + 2 * 128 + 2 * 128  # row and column LSE exps, 2B logs, 2B probs
    assert m["bwd"].bytes == 2 * 128 * 128 * 2 + 4 * 4 * 128  # S in, dS out
    assert m["bwd"].exp == 2 * 128 * 128 and m["fwd"].flops == m["bwd"].flops == 0


def test_infonce_terms_bound_on_h100_by_hand():
    # B = 8192 bf16 forward: 134,348,800 bytes at 3.35 TB/s; 134,250,496 exps at 132 x 16 x 1.98e9 per s
    t_hbm = (8192 * 8192 * 2 + 16 * 8192) / 3.35e12
    t_sfu = (2 * 8192 * 8192 + 4 * 8192) / (132 * 16 * 1.98e9)
    assert t_hbm == pytest.approx(40.10e-6, rel=1e-3) and t_sfu == pytest.approx(32.10e-6, rel=1e-3)
    m = roofline.minimum("infonce_terms", 8192, None, "bf16")
    seconds, side = m["fwd"].time(H100)
    assert side == "HBM" and seconds == pytest.approx(t_hbm, rel=1e-12)
    b = roofline.bound_of(m, "fwd+bwd", H100)
    assert b.sides == ("HBM", "HBM") and b.seconds == pytest.approx(t_hbm + (2 * 8192 * 8192 * 2 + 16 * 8192) / 3.35e12)


def test_embedding_infonce_is_matmul_bound_on_an_a100_by_hand():
    B, D = 1024, 256
    m = roofline.minimum("infonce_terms_embed", B, D, "bf16")
    assert m["fwd"].flops == 2 * 1024 * 1024 * 256 == 536_870_912  # S once
    assert m["bwd"].flops == 6 * 1024 * 1024 * 256  # S again, dS @ txt, dS.T @ img
    assert m["fwd"].bytes == 2 * 1024 * 256 * 2 + 16 * 1024 and m["bwd"].bytes == 4 * 1024 * 256 * 2 + 16 * 1024
    seconds, side = m["fwd"].time(A100)
    assert side == "MMA" and seconds == pytest.approx(536_870_912 / 312e12)  # 1.72 us; HBM 0.52, SFU 0.86
    # fp32 inputs: IEEE dots on the FP32 units, 66.9 TFLOP/s on an H100
    seconds, side = roofline.minimum("proxy_argmax", B, D, "fp32")["fwd"].time(H100)
    assert side == "FP32" and seconds == pytest.approx(536_870_912 / 66.9e12)


def test_kernel_flops_match_the_kernels_docstrings():
    """kernels/infonce_embed.py: 4 B^2 D forward; backward 8 B^2 D for D <= 256, (4 ceil(D/256) + 4) B^2 D
    above (16-bit inputs); kernels/consistency_embed.py: backward 8 B^2 D for D <= 256. fp32 takes 64
    gradient columns per program (``embed_blocks``), so (4 ceil(D/64) + 4) B^2 D."""
    pytest.importorskip("triton", reason="the kernels' counts use the launchers' block sizes")
    B = 8192
    for D, dtype, factor in ((256, "bf16", 8), (1024, "bf16", 4 * 4 + 4), (1024, "fp32", 4 * 16 + 4),
                             (256, "fp32", 4 * 4 + 4)):
        k = roofline.kernel("infonce_terms_embed", B, D, dtype, H100)
        assert k["fwd"].flops == 4 * B * B * D and k["bwd"].flops == factor * B * B * D, (D, dtype)
    k = roofline.kernel("cross_consistency_embed", B, 256, "bf16", H100)
    nb = B // 64  # 64-row blocks: the symmetric tile pairs, diagonal tiles included
    assert k["bwd"].flops == 8 * B * B * 256 and k["fwd"].flops == 2 * B * B * 256 * (1 + 1 / nb)


def test_kernel_reads_s_twice_only_where_it_outgrows_the_l2():
    pytest.importorskip("triton", reason="the kernels' counts use the launchers' block sizes")
    for op in ("infonce_terms", "triplet_terms"):
        small, large = (roofline.kernel(op, B, None, "bf16", H100)["fwd"].bytes for B in (1024, 8192))
        assert 1024 * 1024 * 2 < small < 1.05 * 1024 * 1024 * 2  # 2 MB: the second read is an L2 hit
        assert 2 * 8192 * 8192 * 2 < large < 2.01 * 8192 * 8192 * 2  # 134 MB > 50 MiB: twice from HBM
    # the normalised anchor backward reads all of S for a term that only the anchor's row carries
    m = roofline.minimum("esc_anchor_terms", 8192, None, "bf16")["bwd"].bytes
    k = roofline.kernel("esc_anchor_terms", 8192, None, "bf16", H100)["bwd"].bytes
    assert k - m == pytest.approx(8192 * 8192 * 2, rel=0.01)


def test_the_kernels_never_do_less_than_the_minimum():
    pytest.importorskip("triton", reason="the kernels' counts use the launchers' block sizes")
    checked = 0
    for _, op, key, params in roofline.SECTIONS:
        for B, D, dtype in roofline._shapes(key):
            m = roofline.minimum(op, B, D, dtype, **params)
            for gpu in roofline.GPUS.values():
                k = roofline.kernel(op, B, D, dtype, gpu, **params)
                for p in m:
                    for field in ("bytes", "flops", "exp"):
                        assert getattr(k[p], field) >= getattr(m[p], field), (op, B, D, dtype, p, field)
                    assert k[p].unit == m[p].unit
                    checked += 1
    assert checked > 300


def test_every_op_and_every_benchmark_has_a_roofline():
    from fastncl.kernels import OPS

    covered = {op for _, op, _, _ in roofline.SECTIONS}
    assert covered == set(OPS)
    assert {key for _, _, key, _ in roofline.SECTIONS} == set(targets.SHAPES)
    for op in OPS:
        D = 64 if op == "proxy_argmax" or op.endswith("_embed") else None
        assert roofline.minimum(op, 16, D, "fp32")["fwd"].bytes > 0
    with pytest.raises(ValueError, match="no roofline parameter"):
        roofline.minimum("infonce_terms", 16, None, "bf16", alpha=0.1)


@pytest.mark.parametrize("name, spec", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100-SXM4-40GB", "A100-40GB"), ("NVIDIA A100 80GB PCIe", None),
    ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", None), ("NVIDIA GH200 480GB", None),
    ("NVIDIA GeForce RTX 4090", None), (None, None)])
def test_gpus_are_recognised_by_their_cuda_name(name, spec):
    assert roofline.gpu_for(name) is (None if spec is None else roofline.GPUS[spec])


def test_record_fields_and_fractions():
    rf = roofline.record_fields("infonce_terms", 1024, None, "bf16", "fwd+bwd", "NVIDIA H100 80GB HBM3", tau=0.07)
    m = roofline.minimum("infonce_terms", 1024, None, "bf16")
    assert rf["bytes"] == m["fwd"].bytes + m["bwd"].bytes and rf["roofline_gpu"] == H100.name
    assert rf["roofline_ms"] == pytest.approx((m["fwd"].bytes + m["bwd"].bytes) / 3.35e12 * 1e3)
    assert rf["roofline_binds"] == "HBM+HBM" and "roofline_note" not in rf
    rec = {**rf, "provider": "triton", "median_ms": 0.01, "graph_ms": 0.005, "oom": False}
    fr = roofline.fractions(rec)
    assert fr["roofline_fraction"] == pytest.approx(rf["roofline_ms"] / 0.01)
    assert fr["roofline_graph_fraction"] == pytest.approx(rf["roofline_ms"] / 0.005)
    assert ("roofline_kernel_fraction" in fr) == ("roofline_kernel_ms" in rf)
    other = roofline.record_fields("infonce_terms", 1024, None, "bf16", "fwd", "NVIDIA GeForce RTX 4090")
    assert "roofline_ms" not in other and "RTX 4090" in other["roofline_note"]
    assert roofline.fractions({**other, "median_ms": 0.01}) == {}


def test_every_benchmark_record_gets_its_bound_on_every_known_gpu():
    """What bench/conftest.py asks of the roofline for each benchmark, with the benchmark's own
    parameters (alpha = 0 for the closed-form variant), on every GPU with a spec."""
    pytest.importorskip("triton", reason="the kernels' own bounds use the launchers")
    variants = {"cross_consistency_embed_alpha0": ("cross_consistency_embed", {"alpha": 0.0})}
    names = {"H100": "NVIDIA H100 80GB HBM3", "A100": "NVIDIA A100-SXM4-80GB", "A100-40GB": "NVIDIA A100-SXM4-40GB",
             "H200": "NVIDIA H200"}
    assert set(names) == set(roofline.GPUS)
    for key, shape in targets.SHAPES.items():
        op, params = variants.get(key, (key, {}))
        for B, D, dtype in roofline._shapes(key):
            for mode in shape.get("modes", ("fwd", "fwd+bwd")):
                for name in names.values():
                    rf = roofline.record_fields(op, B, D, dtype, mode, name, **params)
                    assert rf["roofline_ms"] > 0 and rf["roofline_kernel_ms"] >= rf["roofline_ms"] * (1 - 1e-12)
                    assert "roofline_note" not in rf, rf


def test_docs_section_is_generated_and_up_to_date():
    pytest.importorskip("triton", reason="the section holds the kernels' own bounds")
    section = roofline.markdown()
    assert section.startswith(roofline.BEGIN) and section.rstrip().endswith(roofline.END)
    for title, *_ in roofline.SECTIONS:
        assert f"### {title}" in section
    assert "{" not in section and "nan" not in section  # every number of the notes filled in
    doc = (ROOT / "docs" / "kernels.md").read_text(encoding="utf-8")
    assert roofline.replace_section(doc, section) == doc, \
        "docs/kernels.md's Roofline section is out of date: python bench/roofline.py --write docs/kernels.md"
    # the B = 8192 bf16 row of infonce_terms: bytes, exps and both bounds, forward / backward
    row = next(line for line in section.split("### `infonce_terms(sim, tau)`")[1].splitlines()
               if line.startswith("| 8192 | bf16 |"))
    assert "| 134 MB / 269 MB | 134 M / 134 M | 40.1 HBM / 80.2 HBM | 65.9 HBM / 132 HBM |" in row


def test_write_replaces_the_section_atomically_and_bad_input_is_one_line(tmp_path, capsys):
    doc = tmp_path / "k.md"
    doc.write_text("# Kernels\n\ntext\n\n<!-- roofline:begin -->\nold\n<!-- roofline:end -->\n\nafter\n")
    assert roofline.main(["--write", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Kernels\n\ntext\n\n" + roofline.BEGIN) and text.endswith(roofline.END + "\n\nafter\n")
    assert "old" not in text and not [p for p in tmp_path.iterdir() if p.name != "k.md"]  # no temp file left
    capsys.readouterr()
    for argv, message in ((["--write", str(tmp_path / "missing.md")], "--write"), (["--bogus"], "--bogus")):
        with pytest.raises(SystemExit) as e:
            roofline.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    (tmp_path / "plain.md").write_text("no section\n")
    with pytest.raises(SystemExit) as e:
        roofline.main(["--write", str(tmp_path / "plain.md")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "has no roofline section" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "plain.md").read_text() == "no section\n"


def test_alu_budget_is_the_fp32_instruction_rate_over_the_element_rate():
    assert roofline.alu_budget(H100, 2) == pytest.approx((66.9e12 / 2) / (3.35e12 / 2))
    assert math.isclose(roofline.alu_budget(A100, 4), (19.5e12 / 2) / (2.039e12 / 4))
