"""Speaker-verification evaluation: bucketed embedding, cosine scoring, EER and minDCF."""
