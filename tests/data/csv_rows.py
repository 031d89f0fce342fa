"""Reading and rewriting a dataset table's rows in tests that plant faults in a copied dataset."""

import csv


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def write_rows(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
