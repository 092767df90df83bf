"""The experiment harness behind the ``gradshape`` command: data, models, training, reports."""
