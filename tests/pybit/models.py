"""Doubles of PyBit's ``pybit.models`` classes: same module path, same fields.

jsonpickle names a class by its module and name, so a body encoded from these is the
body PyBit's front-end publishes. Written for the tests; no PyBit code.
"""

from __future__ import annotations

import jsonpickle


class Model:
    def toJson(self) -> str:  # noqa: N802 - PyBit's name
        return jsonpickle.encode(self, keys=True)


class Arch(Model):
    def __init__(self, arch_id, name):
        self.id, self.name = arch_id, name


class Dist(Arch):
    pass


class Format(Arch):
    pass


class Suite(Arch):
    pass


class Package(Model):
    def __init__(self, package_id, version, name):
        self.id, self.version, self.name = package_id, version, name


class Transport(Model):
    def __init__(self, transport_id, method, uri, vcs_id):
        self.id, self.method, self.uri, self.vcs_id = transport_id, method, uri, vcs_id


class PackageInstance(Model):
    def __init__(self, instance_id, package, arch, suite, distribution, pkg_format, master):
        self.id, self.package, self.arch, self.suite = instance_id, package, arch, suite
        self.distribution, self.format, self.master = distribution, pkg_format, master


class Job(Model):
    def __init__(self, job_id, packageinstance, buildclient):
        self.id, self.packageinstance, self.buildclient = job_id, packageinstance, buildclient


class BuildRequest(Model):
    def __init__(self, job, transport, web_host, commands=None):
        self.job, self.transport, self.web_host = job, transport, web_host
        self.commands = commands
        self.timestamp = None


class CommandRequest(Model):
    def __init__(self, job, web_host):
        self.job, self.web_host = job, web_host


class CancelRequest(CommandRequest):
    pass


class StatusRequest(CommandRequest):
    pass


class TaskComplete(Model):
    def __init__(self, message, success=True):
        self.success, self.message = success, message
