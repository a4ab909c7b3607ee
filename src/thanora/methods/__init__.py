"""Fine-tuning methods as values. Each ``methods/<name>.py`` builds one frozen `thanora.methods.base.Method`;
`thanora.methods.registry` is the only module that imports them all (``METHODS``, ``get_method``).

There is no base class and no registration at import: a method is added by writing ``methods/<name>.py`` with one
`Method` value and listing it in ``registry.METHODS``. This package file imports nothing, so importing one method
never imports the others.
"""
