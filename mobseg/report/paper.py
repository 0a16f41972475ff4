"""The published results of Kampen, Aspe et al. (NLDL 2026), as printed (SPEC section 1).

Values are kept as the strings of the paper (its precision varies, e.g.
``0.163`` beside ``0.02``) and shown in the report's "paper" columns; they are
quoted, never recomputed. The paper's "Deterministic" row is the pretrained
nnU-Net backbone (tag ``backbone`` in mobseg).
"""

from __future__ import annotations

#: The four target organs, in the order of the paper's tables.
PAPER_ORGANS: tuple[str, ...] = ("pancreas", "gallbladder", "duodenum", "adrenal_gland_left")

#: Column names of the organs in the paper's tables.
ORGAN_LABELS: dict[str, str] = {
    "pancreas": "Pancreas",
    "gallbladder": "Gallbladder",
    "duodenum": "Duodenum",
    "adrenal_gland_left": "AG (L)",
}

#: Row names of the paper's tables, in its order.
PAPER_ROWS: tuple[str, ...] = (
    "Deterministic",
    "Diagonal",
    "Diagonal + Low-rank",
    "Single-Basis",
    "Mixture-of-Bases",
)

Value = tuple[str, str]  # (mean, std) as printed

#: Table: Dice (%) per row and organ, mean +- std over 5 seeds.
PAPER_DICE: dict[str, dict[str, Value]] = {
    "Deterministic": {
        "pancreas": ("80.50", "0.33"),
        "gallbladder": ("79.47", "0.15"),
        "duodenum": ("81.11", "0.16"),
        "adrenal_gland_left": ("87.05", "0.32"),
    },
    "Diagonal": {
        "pancreas": ("80.37", "0.38"),
        "gallbladder": ("79.61", "0.13"),
        "duodenum": ("81.29", "0.28"),
        "adrenal_gland_left": ("86.69", "0.24"),
    },
    "Diagonal + Low-rank": {
        "pancreas": ("80.30", "0.12"),
        "gallbladder": ("79.56", "0.13"),
        "duodenum": ("81.74", "0.31"),
        "adrenal_gland_left": ("86.80", "0.12"),
    },
    "Single-Basis": {
        "pancreas": ("84.01", "0.89"),
        "gallbladder": ("82.53", "0.52"),
        "duodenum": ("82.45", "0.34"),
        "adrenal_gland_left": ("88.23", "1.22"),
    },
    "Mixture-of-Bases": {
        "pancreas": ("84.91", "0.32"),
        "gallbladder": ("82.84", "0.41"),
        "duodenum": ("83.06", "0.30"),
        "adrenal_gland_left": ("87.48", "0.35"),
    },
}

#: Table: NLL per row and organ.
PAPER_NLL: dict[str, dict[str, Value]] = {
    "Deterministic": {
        "pancreas": ("0.27", "0.2"),
        "gallbladder": ("0.17", "0.00"),
        "duodenum": ("0.36", "0.01"),
        "adrenal_gland_left": ("0.022", "0.00"),
    },
    "Diagonal": {
        "pancreas": ("0.23", "0.02"),
        "gallbladder": ("0.163", "0.00"),
        "duodenum": ("0.32", "0.02"),
        "adrenal_gland_left": ("0.020", "0.00"),
    },
    "Diagonal + Low-rank": {
        "pancreas": ("0.21", "0.01"),
        "gallbladder": ("0.146", "0.00"),
        "duodenum": ("0.28", "0.03"),
        "adrenal_gland_left": ("0.02", "0.00"),
    },
    "Single-Basis": {
        "pancreas": ("0.226", "0.01"),
        "gallbladder": ("0.12", "0.00"),
        "duodenum": ("0.303", "0.00"),
        "adrenal_gland_left": ("0.020", "0.00"),
    },
    "Mixture-of-Bases": {
        "pancreas": ("0.21", "0.01"),
        "gallbladder": ("0.13", "0.01"),
        "duodenum": ("0.30", "0.01"),
        "adrenal_gland_left": ("0.02", "0.00"),
    },
}

#: Table: ECE and MCE on the pancreas (the only organ the paper reports them for).
PAPER_CALIBRATION: dict[str, dict[str, dict[str, Value]]] = {
    "pancreas": {
        "Deterministic": {"ece": ("0.017", "0.0"), "mce": ("0.432", "0.1")},
        "Diagonal": {"ece": ("0.018", "0.0"), "mce": ("0.390", "0.1")},
        "Diagonal + Low-rank": {"ece": ("0.012", "0.0"), "mce": ("0.246", "0.0")},
        "Single-Basis": {"ece": ("0.017", "0.0"), "mce": ("0.318", "0.1")},
        "Mixture-of-Bases": {"ece": ("0.014", "0.0"), "mce": ("0.317", "0.1")},
    }
}

#: Split sizes after filtering: (train, val, test).
PAPER_SPLITS: dict[str, tuple[int, int, int]] = {
    "pancreas": (648, 130, 163),
    "gallbladder": (524, 105, 131),
    "duodenum": (614, 154, 154),
    "adrenal_gland_left": (640, 128, 160),
}


def organ_label(organ: str) -> str:
    """Display name of an organ: the paper's column name, else the structure name."""
    return ORGAN_LABELS.get(organ, organ.replace("_", " ").capitalize())
