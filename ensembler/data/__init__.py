"""Sources -> SampleTable, image decoding, grouped stratified k-fold split.

A *Source* reads a dataset into a :class:`SampleTable` (one row per image: ``id``, ``path``,
``label``, ``group`` and, after :func:`split_folds`, ``fold``). Nothing downstream knows
which Source a table came from. Built-in sources (:func:`load_source` detects the kind):

``csv``
    A manifest with columns ``path[,label][,group][,id][,fold]`` (header names are
    case-insensitive; a UTF-8 BOM is fine). Relative paths are resolved against the CSV's
    folder. ``label`` holds class names (classes = the sorted distinct names) or integer
    indices (classes ``"0"..."C-1"``, C = largest index + 1; a ``class_name`` column, as
    ``ensembler data split`` writes, restores the names); with ``label_space=`` every label
    must be one of its classes. No ``label`` column = an unlabeled set to predict. No
    ``group`` = one group per image; no ``id`` = the path as written (relative to the CSV's
    folder). A ``fold`` column is kept (and checked), so a written split can be read back.
    Other columns are carried along as strings.
``folder``
    An image-folder tree ``root/<class>/**/<image>`` (extensions in
    :data:`IMAGE_EXTENSIONS`, case-insensitive; hidden files and folders skipped). Classes are
    the sorted class-folder names; id = ``<class>/<path inside the class folder>``; one group
    per image. A class folder with no image is an error (as torchvision's ImageFolder).
``mask``
    The mask-competition layout. *Train*: ``root/images/<id>_<gender>_<race>_<age>/`` with
    exactly the seven images ``mask1..mask5``, ``incorrect_mask``, ``normal`` (any image
    extension; ``root/train.csv`` is optional and not read: the folder names are the truth;
    ``spec`` may also be the ``images/`` folder itself).
    mask1-5 -> wear (0), incorrect_mask -> incorrect (1), normal -> not wear (2); male 0,
    female 1; age band from ``age_bands`` (default 30,60: <30, 30-59, >=60). Class =
    ``mask*6 + gender*3 + age``, in ``LabelSpace.mask(age_bands)`` (factored: per-factor
    models read ``label_space.factor_indices``). Group = the profile id; row id =
    ``<profile folder>/<stem>``. Hidden entries (``._*``, ``.DS_Store``) and non-image files
    are skipped, but a profile folder that lacks one of the seven images, holds an image with
    another name or two images of one stem, or a folder not named like a profile, is an
    **error** naming every offender (a silently dropped photo would shift the class balance
    and mislabel a person's group). The frame also carries ``profile`` (folder name),
    ``mask``, ``gender`` (factor indices, after label fixes) and ``age_years``.
    *Eval*: ``root/info.csv`` (``ImageID,ans``) + ``root/images/<ImageID>``: an unlabeled
    table in info.csv's row order, id = ImageID, ``source["info_csv"]`` = the CSV's path (a
    submission fills its ``ans``). ``spec`` may also be the info.csv itself.
``digits``
    scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), written once
    as 32x32 RGB PNGs (nearest-neighbour 4x upscale, ink bright on black) into a cache
    folder; classes ``"0".."9"``, id ``digit_00042``, one group per image.

Every source lists rows in a fixed order (CSV / info.csv order; sorted paths otherwise) and
checks that every image file exists; pixels are read later, by :func:`decode_image`.

Image decoding (:func:`decode_image`) fails loudly: a missing, corrupt or truncated file, or
one over Pillow's decompression-bomb limit, raises :class:`ImageDecodeError` naming it.

Modules
-------
table
    :class:`SampleTable`: the noun, its fingerprint and its CSV round trip.
decode
    :func:`decode_image` (bomb guard, EXIF orientation, modes -> RGB) and :func:`verify_images`.
sources
    :func:`load_source`, :func:`load_source_from_args`, :func:`detect_source`, and the
    ``csv`` (:func:`load_csv`) and ``folder`` (:func:`load_image_folder`) sources.
mask
    The ``mask`` source (:func:`load_mask`) and its label-fix CSV (:func:`read_label_fix`).
digits
    The ``digits`` source and its cache (:func:`digits_folder`, :func:`load_digits_table`).
split
    :func:`split_folds`, :func:`check_folds`, :func:`fold_class_counts`.

Import every name from this package (``from ensembler.data import load_source``), not from
its modules: the modules are a layout, not an interface. In particular,
:func:`verify_images` takes the decoder as ``decode=`` (default :func:`decode_image`); the
training and inference datasets look :func:`decode_image` up on this package when they run,
so patching ``ensembler.data.decode_image`` reaches them.
"""

from __future__ import annotations

# Names ensembler/data.py had from its own imports; kept reachable as ensembler.data.<name>.
from .._io import write_json_atomic, write_text_atomic  # noqa: F401
from ..errors import DataError, ImageDecodeError
from ..labels import DEFAULT_AGE_BANDS, LabelSpace, age_band, validate_age_bands
from ._common import IMAGE_EXTENSIONS
from .decode import decode_image, verify_images
from .identical import IdenticalPair, identical_images, warn_identical_images
from .digits import DIGITS_SIZE, DIGITS_VERSION, default_cache_root, digits_folder, load_digits_table
from .mask import (
    GENDER_INDEX,
    LABEL_FIX_COLUMNS,
    MASK_OF_STEM,
    MASK_STEMS,
    PROFILE_RE,
    load_mask,
    read_label_fix,
)
from .sources import SOURCE_KINDS, detect_source, load_csv, load_image_folder, load_source, load_source_from_args
from .split import check_folds, fold_class_counts, split_folds
from .table import CORE_COLUMNS, SampleTable

__all__ = [
    "CORE_COLUMNS",
    "DEFAULT_AGE_BANDS",
    "DIGITS_SIZE",
    "DIGITS_VERSION",
    "DataError",
    "GENDER_INDEX",
    "IMAGE_EXTENSIONS",
    "IdenticalPair",
    "ImageDecodeError",
    "LABEL_FIX_COLUMNS",
    "LabelSpace",
    "MASK_OF_STEM",
    "MASK_STEMS",
    "PROFILE_RE",
    "SOURCE_KINDS",
    "SampleTable",
    "age_band",
    "check_folds",
    "decode_image",
    "default_cache_root",
    "detect_source",
    "digits_folder",
    "fold_class_counts",
    "identical_images",
    "load_csv",
    "load_digits_table",
    "load_image_folder",
    "load_mask",
    "load_source",
    "load_source_from_args",
    "read_label_fix",
    "split_folds",
    "validate_age_bands",
    "verify_images",
    "warn_identical_images",
]
