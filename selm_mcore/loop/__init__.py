"""The SELM round as a list of phases, the phase runner and the reports."""
