"""The data layer: SQLAlchemy models and repositories. All SQL lives here."""
