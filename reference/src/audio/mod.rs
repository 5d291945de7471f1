//! The audio tower of E2B/E4B (temporary module list; the front end is being written).
pub mod attention;
pub mod conformer_layer;
pub mod features_file;
pub mod feed_forward;
pub mod light_conv;
pub mod subsampling;
pub mod tower;
pub mod weights;
