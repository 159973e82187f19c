"""The k-shot / k-val settings of the task families (support and query points per task), kept
free of heavy imports so the command can list them without loading pandas."""

from typing import Dict, Tuple

#: the synthetic regression families (Sec. 5.1)
SYNTHETIC_SETTINGS: Dict[str, Tuple[int, int]] = {"50shot-50val": (50, 50), "100shot-100val": (100, 100)}

#: the paper's k-shot / k-val settings for collaborative filtering (plus the smaller 10shot-15val)
RATING_SETTINGS: Dict[str, Tuple[int, int]] = {"10shot-15val": (10, 15), "15shot-20val": (15, 20),
                                               "20shot-30val": (20, 30)}
