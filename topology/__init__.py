"""The application shell: typed settings, the ``topology`` command and the embedded dev stack."""
