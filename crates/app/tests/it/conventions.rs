//! conventions tests.
