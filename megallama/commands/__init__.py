"""Sub-commands of the ``megallama`` CLI, one module each (see ``megallama.cli``)."""
