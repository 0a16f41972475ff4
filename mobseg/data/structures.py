"""The 117 structure names of TotalSegmentator v2.0.1 (one registry for all of mobseg).

The names are the file stems under ``sXXXX/segmentations/`` in the dataset.
:func:`resolve_organ` is the single place where a user-typed organ name is
checked; a wrong name gets the closest names suggested.
"""

from __future__ import annotations

from mobseg.errors import UnknownNameError

#: The four target organs of the paper (SPEC section 1).
PAPER_ORGANS: tuple[str, ...] = ("pancreas", "gallbladder", "duodenum", "adrenal_gland_left")

#: All structures of TotalSegmentator v2.0.1, sorted.
STRUCTURES: tuple[str, ...] = (
    "adrenal_gland_left",
    "adrenal_gland_right",
    "aorta",
    "atrial_appendage_left",
    "autochthon_left",
    "autochthon_right",
    "brachiocephalic_trunk",
    "brachiocephalic_vein_left",
    "brachiocephalic_vein_right",
    "brain",
    "clavicula_left",
    "clavicula_right",
    "colon",
    "common_carotid_artery_left",
    "common_carotid_artery_right",
    "costal_cartilages",
    "duodenum",
    "esophagus",
    "femur_left",
    "femur_right",
    "gallbladder",
    "gluteus_maximus_left",
    "gluteus_maximus_right",
    "gluteus_medius_left",
    "gluteus_medius_right",
    "gluteus_minimus_left",
    "gluteus_minimus_right",
    "heart",
    "hip_left",
    "hip_right",
    "humerus_left",
    "humerus_right",
    "iliac_artery_left",
    "iliac_artery_right",
    "iliac_vena_left",
    "iliac_vena_right",
    "iliopsoas_left",
    "iliopsoas_right",
    "inferior_vena_cava",
    "kidney_cyst_left",
    "kidney_cyst_right",
    "kidney_left",
    "kidney_right",
    "liver",
    "lung_lower_lobe_left",
    "lung_lower_lobe_right",
    "lung_middle_lobe_right",
    "lung_upper_lobe_left",
    "lung_upper_lobe_right",
    "pancreas",
    "portal_vein_and_splenic_vein",
    "prostate",
    "pulmonary_vein",
    "rib_left_1",
    "rib_left_10",
    "rib_left_11",
    "rib_left_12",
    "rib_left_2",
    "rib_left_3",
    "rib_left_4",
    "rib_left_5",
    "rib_left_6",
    "rib_left_7",
    "rib_left_8",
    "rib_left_9",
    "rib_right_1",
    "rib_right_10",
    "rib_right_11",
    "rib_right_12",
    "rib_right_2",
    "rib_right_3",
    "rib_right_4",
    "rib_right_5",
    "rib_right_6",
    "rib_right_7",
    "rib_right_8",
    "rib_right_9",
    "sacrum",
    "scapula_left",
    "scapula_right",
    "skull",
    "small_bowel",
    "spinal_cord",
    "spleen",
    "sternum",
    "stomach",
    "subclavian_artery_left",
    "subclavian_artery_right",
    "superior_vena_cava",
    "thyroid_gland",
    "trachea",
    "urinary_bladder",
    "vertebrae_C1",
    "vertebrae_C2",
    "vertebrae_C3",
    "vertebrae_C4",
    "vertebrae_C5",
    "vertebrae_C6",
    "vertebrae_C7",
    "vertebrae_L1",
    "vertebrae_L2",
    "vertebrae_L3",
    "vertebrae_L4",
    "vertebrae_L5",
    "vertebrae_S1",
    "vertebrae_T1",
    "vertebrae_T10",
    "vertebrae_T11",
    "vertebrae_T12",
    "vertebrae_T2",
    "vertebrae_T3",
    "vertebrae_T4",
    "vertebrae_T5",
    "vertebrae_T6",
    "vertebrae_T7",
    "vertebrae_T8",
    "vertebrae_T9",
)

_STRUCTURE_SET = frozenset(STRUCTURES)


def resolve_organ(name: str) -> str:
    """Check an organ name against the 117 structures.

    Args:
        name: A structure name; case and surrounding white space are ignored,
            and ``-`` or spaces may stand for ``_``.

    Returns:
        The canonical structure name.

    Raises:
        UnknownNameError: not a structure; the message suggests the closest names.
    """
    canonical = name.strip().replace("-", "_").replace(" ", "_")
    if canonical in _STRUCTURE_SET:
        return canonical
    lowered = {s.lower(): s for s in STRUCTURES}
    if canonical.lower() in lowered:
        return lowered[canonical.lower()]
    raise UnknownNameError("organ", name, STRUCTURES)
