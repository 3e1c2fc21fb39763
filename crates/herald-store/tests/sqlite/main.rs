//! Integration tests of the SQLite history store, in one test binary so the helpers in
//! `common` are shared without dead-code noise.

mod checkpoint;
mod common;
mod conformance;
mod durability;
mod retention;
