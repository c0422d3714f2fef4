"""Names and constants of the competition, defined once for the whole repo."""

from __future__ import annotations

# Fixed target order everywhere: arrays of shape (N, 5) follow it.
TARGETS: tuple[str, ...] = ("Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g", "GDM_g", "Dry_Total_g")
TARGET_WEIGHTS: tuple[float, ...] = (0.1, 0.1, 0.1, 0.2, 0.5)
SHORT_NAMES: tuple[str, ...] = ("green", "dead", "clover", "gdm", "total")

TRAIN_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "image_path",
    "Sampling_Date",
    "State",
    "Species",
    "Pre_GSHH_NDVI",
    "Height_Ave_cm",
    "target_name",
    "target",
)
TEST_COLUMNS: tuple[str, ...] = ("sample_id", "image_path", "target_name")
SUBMISSION_COLUMNS: tuple[str, ...] = ("sample_id", "target")
SAMPLE_ID_SEP = "__"

# Auxiliary classification labels (training only). Values outside the lists map to -1 (ignored).
STATES: tuple[str, ...] = ("Tas", "Vic", "NSW", "WA")
# The 10 calendar months present in the 2015 sampling campaign (no March, no December).
MONTHS: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 8, 9, 10, 11)

# 15 species names of train.csv -> 8 groups. Grouped by what the camera sees: clover share
# (drives Dry_Clover_g) and grass type (texture, height). Pure clovers share one group whatever
# the cultivar; every phalaris mix containing clover is one group; unseen names go to "other".
SPECIES_GROUPS: tuple[str, ...] = (
    "ryegrass_clover",
    "ryegrass",
    "phalaris_clover",
    "phalaris",
    "clover",
    "fescue",
    "lucerne",
    "other",
)
SPECIES_TO_GROUP: dict[str, str] = {
    "Ryegrass_Clover": "ryegrass_clover",
    "Ryegrass": "ryegrass",
    "Phalaris_Clover": "phalaris_clover",
    "Phalaris_Ryegrass_Clover": "phalaris_clover",
    "Phalaris_Clover_Ryegrass_Barleygrass_Bromegrass": "phalaris_clover",
    "Phalaris_BarleyGrass_SilverGrass_SpearGrass_Clover_Capeweed": "phalaris_clover",
    "Phalaris": "phalaris",
    "Clover": "clover",
    "WhiteClover": "clover",
    "SubcloverLosa": "clover",
    "SubcloverDalkeith": "clover",
    "Fescue": "fescue",
    "Fescue_CrumbWeed": "fescue",
    "Lucerne": "lucerne",
    "Mixed": "other",
}


def species_group(species: str) -> str:
    """Map a species name to its group; names never seen in train.csv go to 'other'."""
    return SPECIES_TO_GROUP.get(str(species), "other")


def class_index(value: object, classes: tuple) -> int:
    """Index of value in classes, -1 (ignored by the loss) when absent."""
    try:
        return classes.index(value)
    except ValueError:
        return -1
