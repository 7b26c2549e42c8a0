"""Run a MODEL_DIR on a site folder: ``cohort.csv`` in, ``predictions.csv`` out (MONAI bundle entry).

Used by ``configs/inference.json`` (``python -m monai.bundle run ... --dataset_dir SITE_DIR
--output_dir OUT``). Imports only the standard library, torch and MONAI, so it runs where gliofed is not
installed. Rows without the model's image columns (or, for two-timepoint models, without a readable
baseline row) are skipped with a printed reason, as ``gliofed predict`` does.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn


def _path(site: Path, cell: str) -> Path:
    p = Path(cell.strip()).expanduser()
    return p if p.is_absolute() else (site / p).resolve()


def _clinical(row: dict[str, str], columns: Sequence[str]) -> torch.Tensor:
    vals = []
    for col in columns:
        try:
            vals.append(float((row.get(col) or "").strip() or "nan"))
        except ValueError:
            vals.append(math.nan)
    return torch.tensor([vals], dtype=torch.float32)


class CohortPredictor:
    """Preprocess each eligible row with ``preprocessing``, run ``network``, write class probabilities."""

    def __init__(self, network: nn.Module, preprocessing: Callable, checkpoint: str | Path,
                 inputs: Sequence[str], classes: Sequence[str], timepoints: int = 1,
                 subtraction: bool = False, clinical: Sequence[str] = (),
                 device: str | torch.device = "cpu") -> None:
        self.network = network
        self.preprocessing = preprocessing
        self.checkpoint = Path(checkpoint)
        self.inputs = list(inputs)
        self.classes = list(classes)
        self.timepoints = int(timepoints)
        self.subtraction = bool(subtraction)
        self.clinical = list(clinical)
        self.device = torch.device(device)

    def _session(self, site: Path, row: dict[str, str]) -> torch.Tensor:
        data = {c: str(_path(site, row[c])) for c in self.inputs}
        return torch.as_tensor(self.preprocessing(data)["image"]).float()

    def rows(self, site: Path) -> tuple[list[tuple[dict, dict | None]], list[tuple[str, str]]]:
        """Eligible (row, baseline row) pairs in file order, and (case_id, reason) for the others."""
        text = (site / "cohort.csv").read_text(encoding="utf-8-sig")
        rows = [{(k or "").strip(): (v or "") for k, v in r.items()} for r in csv.DictReader(text.splitlines())]
        rows = [r for r in rows if any(v.strip() for v in r.values())]
        by_id = {r.get("case_id", "").strip(): r for r in rows}
        ok, skipped = [], []
        for r in rows:
            cid = r.get("case_id", "").strip()
            missing = [c for c in self.inputs if not (r.get(c) or "").strip()]
            if missing:
                skipped.append((cid, f"missing input(s) {', '.join(missing)}"))
                continue
            base = None
            if self.timepoints == 2:
                bid = (r.get("baseline_case_id") or "").strip()
                base = by_id.get(bid) if bid else None
                if base is None:
                    skipped.append((cid, f"baseline {bid or '(none)'} not in cohort"))
                    continue
                if any(not (base.get(c) or "").strip() for c in self.inputs):
                    skipped.append((cid, f"baseline {bid} missing inputs"))
                    continue
            ok.append((r, base))
        return ok, skipped

    @torch.no_grad()
    def run(self, dataset_dir: str | Path, output_dir: str | Path) -> Path:
        site, out = Path(dataset_dir).resolve(), Path(output_dir)
        if not (site / "cohort.csv").is_file():
            raise FileNotFoundError(f"{site}/cohort.csv: missing (dataset_dir must be a site folder)")
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        self.network.load_state_dict(state)
        self.network.to(self.device).eval()
        ok, skipped = self.rows(site)
        out.mkdir(parents=True, exist_ok=True)
        dest = out / "predictions.csv"
        with dest.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["case_id", "label", *[f"prob_{c}" for c in self.classes]])
            for row, base in ok:
                xs = ([self._session(site, base)] if base is not None else []) + [self._session(site, row)]
                if self.timepoints == 2 and self.subtraction:
                    xs.append(xs[1] - xs[0])
                x = torch.cat(xs, 0)[None].to(self.device)
                args = (x, _clinical(row, self.clinical).to(self.device)) if self.clinical else (x,)
                logits = self.network(*args)
                logits = logits[0] if isinstance(logits, tuple) else logits
                p = torch.softmax(logits.float(), 1)[0].cpu()
                w.writerow([row["case_id"].strip(), self.classes[int(p.argmax())],
                            *[f"{float(v):.6f}" for v in p]])
        for cid, reason in skipped:
            print(f"skipped {cid}: {reason}")
        print(f"{len(ok)} predictions written to {dest}")
        return dest
