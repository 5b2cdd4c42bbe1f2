//! Scores: softmax, top-k (being written).
