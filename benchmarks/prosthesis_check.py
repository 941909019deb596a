"""How the knee-prosthesis check behaves: false alarms on real knees, hits on drawn-in metal.

There is no real implant film in the project, so the hits are measured on real joint
crops with a metal implant drawn in (:func:`kneepipe.training.implant.draw_knee_implant`),
and the false alarms on real knees without implants: the OAI val crops and the 20
annotated AP joints of the shared radiographs. Prints JSON.

    python benchmarks/prosthesis_check.py [--metal-level 245] [--contrast 25] [--fraction 0.02]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"


def real_joint_crops() -> list[np.ndarray]:
    """The 20 annotated AP joints of the shared radiographs, cut as the detector cuts them."""
    from kneepipe.detect.evaluate import read_annotations
    from kneepipe.detect.framing import crop_joint
    from kneepipe.imaging import read_radiograph

    crops = []
    for name, entry in sorted(read_annotations(ROOT / "tests" / "data" / "radiograph_annotations.csv").items()):
        if not entry["joints"]:
            continue
        pixels = read_radiograph(SHARED / "radiographs" / name).pixels
        crops += [crop_joint(pixels, box, size=224) for _, box in entry["joints"]]
    return crops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metal-level", type=int, default=245)
    parser.add_argument("--contrast", type=float, default=25)
    parser.add_argument("--fraction", type=float, default=0.02)
    args = parser.parse_args()

    import cv2

    from kneepipe.detect.quality import metal_fraction
    from kneepipe.training.implant import draw_knee_implant

    def fractions(crops: list[np.ndarray]) -> np.ndarray:
        return np.array([metal_fraction(crop, args.metal_level, args.contrast) for crop in crops])

    def flagged(values: np.ndarray) -> dict:
        return {
            "flagged": int((values > args.fraction).sum()),
            "of": len(values),
            "max_fraction": round(float(values.max()), 4),
            "p99_fraction": round(float(np.percentile(values, 99)), 4),
        }

    oai = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted((SHARED / "oai-kl224" / "val").glob("*/*.png"))]
    real = real_joint_crops()
    figures: dict = {
        "metal_level": args.metal_level,
        "metal_contrast": args.contrast,
        "prosthesis_fraction": args.fraction,
        "no_implant": {"oai_val_crops": flagged(fractions(oai)), "shared_ap_joints": flagged(fractions(real))},
        "drawn_implant": {},
    }
    rng = np.random.default_rng(0)
    for grey in (245, 250, 255):
        for partial in (False, True):
            kind = f"{'unicompartmental' if partial else 'total'}_grey{grey}"
            drawn_oai = [draw_knee_implant(crop, rng, grey=grey, partial=partial) for crop in oai[::4]]
            drawn_real = [draw_knee_implant(crop, rng, grey=grey, partial=partial) for crop in real]
            figures["drawn_implant"][kind] = {
                "oai_val_crops": flagged(fractions(drawn_oai)),
                "shared_ap_joints": flagged(fractions(drawn_real)),
            }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
