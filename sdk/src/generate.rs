//! Text generation helpers: seeded sampling, penalties, stop sequences, UTF-8 hold-back (being written).
