"""Sub-models of a lab for the benchmarks: one ``sub`` run per cluster of ``clusters``
(``{row id: cluster}``), trained in process with the lab's SFT settings."""

from __future__ import annotations

from pathlib import Path


def train_lab_subs(lab: Path, clusters: dict[str, int], steps: int, work: Path) -> list[Path]:
    from dtm.jobs.runner import run_training as train  # lazy: torch
    from dtm.lab.measure import LAB_SFT  # lazy: torch, kept out of the scripts' --help
    from dtm.train import TrainConfig

    asg = work / "asg.csv"
    asg.write_text("id,cluster\n" + "".join(f"{i},{c}\n" for i, c in clusters.items()))
    adapters = []
    for c in sorted(set(clusters.values())):
        out = work / f"s{c}"
        train(
            TrainConfig(
                base=str(lab / "model"),
                data=str(lab / "data" / "train.jsonl"),
                val_data=str(lab / "data" / "val.jsonl"),
                out=str(out),
                kind="sub",
                assignments=str(asg),
                cluster=c,
                steps=steps,
                log_every=steps,
                fisher_size=8,
                **LAB_SFT,
            )
        )
        adapters.append(out / "adapter")
    return adapters
