"""CT volumes, radiology reports, manifests, the phantom dataset and input pipelines."""
