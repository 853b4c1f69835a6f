#!/usr/bin/env python3
"""Fortran-ordered copies of existing fixtures, for the .npy/.npz readers' column-major path.

NumPy writes `fortran_order: True` for any array that is Fortran-contiguous and not
C-contiguous — every transposed array it saves (`np.save(f, w.T)`), so real `.npz`
checkpoints built from transposed kernels and `.npy` inputs made with `.T` have them. This
script needs only numpy (see tools/requirements.txt); from the repository root:

    python tools/make_fortran_fixtures.py

writes tests/fixtures/fortran/:
- `input_f.npy`: hf_cls's `ref/input.npy` (2, 3, 32, 32), Fortran-ordered; its logits are
  hf_cls's `ref/logits.npy`.
- `model_f.npz`: npz-vit's `model.npz` with every array of two or more dimensions
  Fortran-ordered; its logits on npz-vit's `input.npy` are npz-vit's `logits.npy`.
"""
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "fortran"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    x = np.load(FIX / "hf_cls" / "ref" / "input.npy")
    xf = np.asfortranarray(x)
    assert xf.flags.f_contiguous and not xf.flags.c_contiguous
    np.save(OUT / "input_f.npy", xf, allow_pickle=False)
    with open(OUT / "input_f.npy", "rb") as f:
        assert b"'fortran_order': True" in f.read(128)

    src = np.load(FIX / "npz-vit" / "model.npz")
    arrays = {}
    n_fortran = 0
    for k in src.files:
        a = src[k]
        if a.ndim >= 2 and min(a.shape) > 1:
            a = np.asfortranarray(a)
            assert not a.flags.c_contiguous
            n_fortran += 1
        arrays[k] = a
    np.savez(OUT / "model_f.npz", **arrays)
    back = np.load(OUT / "model_f.npz")
    for k in src.files:
        assert np.array_equal(back[k], src[k]), k
    print(f"wrote {OUT}/input_f.npy and {OUT}/model_f.npz ({n_fortran} of {len(src.files)} arrays Fortran-ordered)")


if __name__ == "__main__":
    main()
