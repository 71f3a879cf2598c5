"""``check --report``: every figure and gate as Markdown, and a chart of size against accuracy."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConvLlavaEdgeError


def write_report(result, folder: Path) -> tuple[Path, Path]:
    """report.md (every figure and gate) and chart.png (size against accuracy per variant)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConvLlavaEdgeError("--report needs matplotlib (pip install 'convllava-edge[report]')") from e
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md = [f"# convllava-edge check: {Path(result.bundle).name}", "",
          f"Reference: {result.reference['kind']} `{result.reference['path']}`; inputs: {result.inputs['source']} "
          f"({result.inputs['n_images']} images, {result.inputs['n_questions']} questions).", "",
          f"**{'PASSED' if result.passed else 'FAILED'}**", "", "## Vision", "",
          f"Reference: {result.vision.get('reference')}", "",
          "| variant | size | features cos mean | features cos min | embeds cos mean | embeds cos min | embeds rel L2 |",
          "|---|---|---|---|---|---|---|"]
    for v, figs in result.vision.get("variants", {}).items():
        f, e = figs["features"], figs["embeds"]
        md.append(f"| {v} | {result.sizes.get('vision ' + v, 0) / 1e6:.1f} MB | {f['cosine_mean']:.5f} | "
                  f"{f['cosine_min']:.5f} | {e['cosine_mean']:.5f} | {e['cosine_min']:.5f} | {e['rel_l2']:.2e} |")
    md += ["", "## LLM", "", f"Reference: {result.llm.get('reference')}", "",
           "| variant | KL mean | KL p99 | top-1 | perplexity change |", "|---|---|---|---|---|"]
    for v, a in result.llm.get("variants", {}).items():
        ppl = f"{a['perplexity_change']:+.2%}" if "perplexity_change" in a else "-"
        md.append(f"| {v} | {a['kl_mean']:.4f} | {a['kl_p99']:.4f} | {a['top1']:.3f} | {ppl} |")
    if result.llm.get("note"):
        md.append(f"\n{result.llm['note']}")
    md += ["", "## Answers", "", f"Reference: {result.answers.get('reference')}", "",
           "| combination | exact | first token | accuracy |", "|---|---|---|---|"]
    for c, a in result.answers.get("combinations", {}).items():
        acc = f"{a['accuracy']['overall']:.3f}" if "accuracy" in a else "-"
        md.append(f"| {c} | {a['exact']:.3f} | {a['first_token']:.3f} | {acc} |")
    if result.samples:  # what a user is shown, side by side (scored by: the inputs' rule)
        md += ["", f"Sample answers (accuracy scored by {result.inputs.get('scoring', 'exact match')}):", ""]
        for sample in result.samples:
            md.append(f"- {sample['question']}: " + "; ".join(f"{who}: {text!r}" for who, text in sample.items()
                                                               if who != "question"))
    md += ["", "## Gates", "", "| gate | stage | subject | value | threshold | result |", "|---|---|---|---|---|---|"]
    for g in result.gates:
        md.append(f"| {g.name} | {g.stage} | {g.subject} | {g.value:.4g} | {g.threshold:g} | "
                  f"{'pass' if g.passed else '**FAIL**'} |")
    report = folder / "report.md"
    report.write_text("\n".join(md) + "\n", encoding="utf-8")

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    points = []
    llm_size = next((s for k, s in result.sizes.items() if k.startswith("LLM")), 0)
    for combo, a in result.answers.get("combinations", {}).items():
        vision = combo.split(" + ")[0]
        size = (result.sizes.get(f"vision {vision}", 0) + llm_size) / 1e6
        score = a["accuracy"]["overall"] if "accuracy" in a else a["exact"]
        points.append((size, score, combo))
    ref_acc = result.answers.get("reference_accuracy")
    if "size" in result.reference:
        points.append((result.reference["size"] / 1e6, ref_acc["overall"] if ref_acc else 1.0, "reference"))
    for size, score, label in points:
        ax.scatter([size], [score], marker="s" if label == "reference" else "o")
        ax.annotate(label, (size, score), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("bundle size, MB (vision graph + LLM)")
    ax.set_ylabel("answer accuracy" if points and "accuracy" in next(iter(result.answers["combinations"].values()))
                  else "answers equal to the reference")
    ax.set_title("size against accuracy per variant")
    ax.grid(alpha=0.3)
    chart = folder / "chart.png"
    fig.tight_layout()
    fig.savefig(chart, format="png")
    plt.close(fig)
    return report, chart
