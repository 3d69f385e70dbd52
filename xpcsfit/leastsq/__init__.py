"""Least-squares fits: the driver, start values, results, output and plots."""
