"""fairage: fair apparent-age estimation.

Train a face-image age regressor, measure how its error differs across age, gender,
ethnicity and expression groups, and reduce those differences with sample weighting.
"""

__version__ = "0.1.0"
