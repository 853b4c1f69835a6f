//! Pictures: training curves, confusion matrices and attention maps as PNG files, drawn on a small RGB
//! canvas with an embedded 8×8 bitmap font (no system fonts needed).

pub mod attention;
pub mod canvas;
pub mod confusion;
pub mod curve;
pub mod heatmap;
