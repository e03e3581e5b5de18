"""Packaging for rbit, a job runner for RabbitMQ."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
README = HERE / "README.rst"
# One version, kept in rbit/__init__.py (read as text: setup.py runs before the
# dependencies are installed).
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "rbit" / "__init__.py").read_text())[1]

setup(
    name="rbit",
    version=VERSION,
    description="A job runner for RabbitMQ: PyBit-compatible queues, python and shell "
    "runners, job statuses, and batched CreditPiggy credits",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/x-rst",
    license="AGPL-3.0-or-later",
    license_files=["license.txt"],
    # rbit, rbit.runners, rbit.credit and rbitext, plus any subpackage they grow.
    packages=find_packages(include=["rbit", "rbit.*", "rbitext", "rbitext.*"]),
    # The dashboard's page (rbit.dashboard): served from the installed package.
    package_data={"rbit.dashboard": ["static/*.html", "static/*.js", "static/*.css"]},
    python_requires=">=3.11",
    install_requires=[
        # rbit.amqp.loops writes frames straight to pika's plain-TCP transport, a
        # private pika API (_AsyncPlaintextTransport, _adapter_emit_data), and
        # rbit.amqp.frames decodes content headers in Connection._read_frame (with
        # _frame_buffer; BlockingConnection's _impl_class), and rbit.amqp.inbound
        # decodes whole deliveries in Connection._on_data_available (with _channels and
        # the channel's _consumers, _cancelled and _content_assembler): bounded to the
        # minor releases known to have them (tested with pika 1.4.4).
        "pika>=1.3,<1.5",
        "jsonpickle>=3",
        # /metrics: the Prometheus text format and its parser, kept in step with
        # Prometheus itself; 0.17 has the per-process registries and custom collectors
        # used here.
        "prometheus_client>=0.17,<1",
        "setuptools",
        # Ed25519 signatures of jobs (rbit.security): a vetted implementation instead of
        # a hand-made primitive; 41 has the Ed25519 and serialization APIs used here.
        "cryptography>=41,<50",
        # cron = ... schedules (rbit.schedule.triggers): cronsim, a small, maintained,
        # dependency-free evaluator of standard cron expressions, DST-aware with zoneinfo.
        "cronsim>=2.6,<3",
    ],
    extras_require={
        # ruff is pinned to a minor series: its rules change between them, and the test
        # command fails on any lint error.
        # selenium drives Debian's chromium (chromium-driver) in the dashboard's browser
        # test; 4.x has the W3C-only WebDriver API used there.
        "test": ["pytest", "pytest-timeout", "hypothesis", "ruff>=0.17,<0.18",
                 "selenium>=4.10,<5"],
    },
    entry_points={
        "console_scripts": [
            "rbit = rbit.cli:main",
            "rbit-credit = rbit.credit.cli:main",
        ],
    },
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Environment :: No Input/Output (Daemon)",
        "Intended Audience :: System Administrators",
        "Operating System :: POSIX",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Topic :: System :: Distributed Computing",
    ],
)
