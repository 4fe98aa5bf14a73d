//! placeholder: the GStreamer plugin lands with issue 5.
