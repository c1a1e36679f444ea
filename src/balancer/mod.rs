//! Backend selection: the Maglev table.
