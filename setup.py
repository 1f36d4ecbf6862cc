"""Maps the top-level folders onto one import tree: dsv4.runtime, dsv4.kernels, dsv4.operator, ...

`operator/` has no __init__.py on purpose: as a namespace folder it can never shadow the stdlib
`operator` module, whatever the working directory. Metadata lives in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

ROOTS = {
    "dsv4": "dsv4",
    "dsv4.runtime": "runtime",
    "dsv4.kernels": "kernels",
    "dsv4.operator": "operator",
    "dsv4.bench": "bench",
    "dsv4.e2e": "e2e",
}
SKIP = ["tests", "tests.*", "results", "results.*", "__pycache__"]

packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_namespace_packages(folder, exclude=SKIP)]

setup(packages=packages, package_dir=ROOTS, include_package_data=True)
