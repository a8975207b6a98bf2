"""Builds cmd-optim's optional C extension (cmd_optim/core/kernels/_native.c); everything else is in pyproject.toml.

The extension is plain C on raw pointers (no torch headers), compiled with OpenMP where the compiler has
it. If it cannot be built (no compiler, an unusual platform), the install goes on without it and the
package uses its stock-PyTorch kernels (``cmd_optim.core.kernels.backend()`` says which).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalOpenMPBuild(build_ext):
    """Try with OpenMP, then without; never fail the install over the extension."""

    def build_extension(self, ext):
        flags = (["-O3", "-fopenmp", "-ffp-contract=off"], ["-fopenmp"])
        for compile_args, link_args in (flags, (["-O3", "-ffp-contract=off"], [])):
            ext.extra_compile_args, ext.extra_link_args = compile_args, link_args
            try:
                return super().build_extension(ext)
            except Exception as error:  # a compiler or linker error: try the next way
                print(f"cmd-optim: building {ext.name} with {compile_args} failed ({error})")
        print("cmd-optim: the C extension was not built; the stock-PyTorch kernels will be used")
        return None


setup(
    ext_modules=[Extension("cmd_optim.core.kernels._native", sources=["cmd_optim/core/kernels/_native.c"],
                           optional=True)],
    cmdclass={"build_ext": OptionalOpenMPBuild},
)
