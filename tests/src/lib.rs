//! End-to-end tests of the `grandmodel` program live in `tests/`; this library is empty.
