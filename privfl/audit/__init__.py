"""Privacy audits: accounting reports, empirical epsilon lower bounds, config linting."""
