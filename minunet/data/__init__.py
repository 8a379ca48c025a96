"""Data for cell segmentation: synthetic cells, real-data loaders, the paper's weight maps,
augmentation and training tiles.

* :mod:`minunet.data.synthetic` - seeded synthetic microscopy images with exact labels;
* :mod:`minunet.data.loaders` - image/mask folders, ISBI 2012, the DSB 2018 nuclei image;
* :mod:`minunet.data.weights` - class-balancing and border weights (the paper's Eq. 2);
* :mod:`minunet.data.augment` - elastic deformation, flips/rotations, gray-value jitter;
* :mod:`minunet.data.tiles` - mirror padding and random training tiles;
* :mod:`minunet.data.writers` - probability maps, label images and overlays written to files.
"""

from minunet.data.augment import (
    DIHEDRAL,
    apply_dihedral,
    augment,
    elastic_deform,
    elastic_displacement,
    gray_value_jitter,
    invert_dihedral,
    random_dihedral,
    warp,
)
from minunet.data.loaders import (
    Dataset,
    as_image,
    as_labels,
    dsb2018_nuclei_paths,
    is_colour,
    load_dsb2018_nuclei,
    load_folder,
    load_isbi2012,
    normalize_intensity,
    pair_image_masks,
    read_image,
)
from minunet.data.synthetic import synthetic_cell_image, synthetic_cells
from minunet.data.tiles import TileSampler, crop_margin, extract_tile, mirror_pad
from minunet.data.weights import (
    boundary_classes,
    carve_separation_borders,
    class_weight_map,
    instances_from_mask,
    separation_borders,
    two_nearest_cell_distances,
    weight_map,
)
from minunet.data.writers import (
    check_array_suffix,
    save_figure,
    save_overlay,
    save_slide_overlay,
    write_array,
    write_centroids,
)

__all__ = [
    "DIHEDRAL", "Dataset", "TileSampler", "apply_dihedral", "as_image", "as_labels", "augment",
    "boundary_classes", "carve_separation_borders", "check_array_suffix", "class_weight_map",
    "crop_margin", "dsb2018_nuclei_paths", "elastic_deform", "elastic_displacement",
    "extract_tile", "gray_value_jitter", "instances_from_mask", "invert_dihedral", "is_colour",
    "load_dsb2018_nuclei", "load_folder", "load_isbi2012", "mirror_pad",
    "normalize_intensity", "pair_image_masks", "random_dihedral", "read_image",
    "save_figure", "save_overlay", "save_slide_overlay", "separation_borders",
    "synthetic_cell_image", "synthetic_cells", "two_nearest_cell_distances", "warp",
    "weight_map", "write_array", "write_centroids",
]
