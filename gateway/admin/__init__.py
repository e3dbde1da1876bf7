"""The admin service, its client and the status it reports (operator surfaces)."""
