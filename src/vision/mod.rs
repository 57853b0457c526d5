//! Vision: the image side every stage shares — decoding and PIL-exact resizing (`preprocess`),
//! CLIPImageProcessor's normalisation, and the frozen CLIP tower whose features the model is
//! trained on (`clip`). Ingest computes features with it once; generation and serving compute
//! the features of a user's images with the very same code. Reads images and CLIP weights only.

pub mod clip;
pub mod preprocess;
