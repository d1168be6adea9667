"""The report writers: tables (markdown, CSV, JSON), report.html, their figures, and
the findings model they share."""
