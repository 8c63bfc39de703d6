"""Self-Supervised Positive Sampling: on-device memory queues, clustering and sampling."""
