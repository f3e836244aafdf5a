"""The ``curate`` command line: options and layered settings (options), the verb
declaration (verb), the table of verbs (registry), recipe validation (recipes)
and the dispatcher (main)."""
