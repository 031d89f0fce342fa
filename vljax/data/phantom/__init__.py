"""The synthetic phantom dataset: abdominal CT volumes with designed findings, their reports, labels
and phenotype codes, written in the Merlin release layout (so the real data layer reads it unchanged).

  generator  studies -> NIfTI volumes, reports.csv, labels, phenotypes (`generate_phantom`)
  anatomy    the renderer: body, organs, vessels, bones, and each finding drawn in its structure
  signs      the one table of what each finding draws, how large and how dense
  text       the report writer: Merlin-style sections from the same drawn parameters
"""

from vljax.data.phantom.generator import (
    PhantomConfig,
    StudySpec,
    study_id,
    sample_spec,
    render_canonical,
    canonical_affine,
    to_storage,
    render_study,
    nifti_image,
    report_for,
    phenotypes_for,
    generate_phantom,
    GENERATOR_VERSION,
    IMAGES_DIR,
    REPORTS_FILE,
    LABELS_FILE,
    PHENOTYPES_FILE,
    PHECODES_FILE,
    METADATA_FILE,
    INFO_FILE,
    MARKER_FILE,
    AGE_LINKED,
    SPLITS,
    PREVALENCE,
    MENTION,
    PHECODES,
    ORIENTATIONS,
)

__all__ = ['PhantomConfig', 'StudySpec', 'study_id', 'sample_spec', 'render_canonical', 'canonical_affine', 'to_storage', 'render_study', 'nifti_image', 'report_for', 'phenotypes_for', 'generate_phantom', 'GENERATOR_VERSION', 'IMAGES_DIR', 'REPORTS_FILE', 'LABELS_FILE', 'PHENOTYPES_FILE', 'PHECODES_FILE', 'METADATA_FILE', 'INFO_FILE', 'MARKER_FILE', 'AGE_LINKED', 'SPLITS', 'PREVALENCE', 'MENTION', 'PHECODES', 'ORIENTATIONS']
