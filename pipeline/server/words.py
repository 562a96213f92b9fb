"""The English words the simulated model writes with (:mod:`pipeline.server.simulate`'s reply
text, and filler strings in :mod:`pipeline.server.schema_answers`)."""

from __future__ import annotations

from typing import Final

_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if so "
    "no will can more other its what about up out them some into time only could new these two "
    "may first then do any like my now over such our man me even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long here "
    "get both between life being under never day same another know while last might us great "
    "old year off come since against go came right used take three"
)
_STARTER_TEXT = "the this it we in a there these some one many most each when if our"
WORDS: Final = tuple(_WORD_TEXT.split())
"""Common words, lower case, in a fixed order (draws from it are reproducible)."""
STARTERS: Final = tuple(_STARTER_TEXT.split())
"""The words a sentence may start with, lower case."""
