"""No secret in any output stream or file: pulls that really use a Hub token, an AWS secret key and
an Azure SAS, each once successfully and once failing (failures print the most context)."""

from __future__ import annotations

import datetime as dt
import os

import pytest

from conftest import TOKEN, hub_env, pull_args, run_agent
from objstore.helpers import env_for
from objstore.servers import AZURITE_ACCOUNT, AZURITE_KEY, S3_SECRET, Azurite, SeaweedFS, azurite_bin

pytestmark = pytest.mark.timeout(180)


def grep_everything(tmp_path, outputs: list[str], secrets: dict[str, str]) -> None:
    files = [p.read_text(errors="replace") for p in tmp_path.rglob("*")
             if p.is_file() and not p.is_symlink() and p.stat().st_size < 2_000_000 and "servers" not in p.parts]
    blob = "\n".join(outputs + files)
    for name, secret in secrets.items():
        assert secret not in blob, f"the {name} leaked"


@pytest.mark.skipif(azurite_bin() is None, reason="azurite not installed: run scripts/install-test-tools.sh")
def test_hub_token_aws_secret_and_azure_sas_never_leak(hub, demo_files, tmp_path, tmp_path_factory):
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    servers = tmp_path / "servers"
    outputs: list[str] = []
    # Hub, with a token the private repo needs.
    hub.add_repo("org/private", demo_files, private=True)
    for repo in ("org/private", "org/missing"):
        r = run_agent(*pull_args(hub, repo, tmp_path / "hub-cache"), env=hub_env(hub, HF_TOKEN=TOKEN))
        outputs += [r.stdout, r.stderr]
    assert "org/private" in outputs[1] and '"already_ready": false' in outputs[1]

    with SeaweedFS(servers / "weed") as weed, Azurite(servers / "azurite") as az:
        # S3 with the secret key, then a bucket that does not exist.
        weed.client().create_bucket(Bucket="secret-test")
        weed.client().put_object(Bucket="secret-test", Key="m/config.json", Body=b"{}")
        for bucket, code in (("secret-test", 0), ("no-such-bucket", 4)):
            r = run_agent("pull", f"s3://{bucket}/m/", "--local-dir", str(tmp_path / f"s3-{bucket}"), "--log-format", "json",
                          env=env_for(weed.env()))
            assert r.returncode == code, r.stderr
            outputs += [r.stdout, r.stderr]
        # Azure with a read-only container SAS in the connection string, then a container it cannot read.
        az.service().create_container("sas-test").upload_blob("m/config.json", b"{}")
        sas = generate_container_sas(AZURITE_ACCOUNT, "sas-test", account_key=AZURITE_KEY,
                                     permission=ContainerSasPermissions(read=True, list=True),
                                     expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
        conn = f"BlobEndpoint={az.url};SharedAccessSignature={sas}"
        for container, fmt in (("sas-test", "json"), ("other-container", "text")):
            r = run_agent("pull", f"az://{container}/m/", "--local-dir", str(tmp_path / f"az-{container}"), "--log-format",
                          fmt, env=env_for({"AZURE_STORAGE_CONNECTION_STRING": conn}))
            assert (r.returncode == 0) == (container == "sas-test"), r.stderr
            outputs += [r.stdout, r.stderr]
    sig = [part for part in sas.split("&") if part.startswith("sig=")][0]
    grep_everything(tmp_path, outputs, {"Hub token": TOKEN, "AWS secret key": S3_SECRET, "Azure SAS signature": sig,
                                        "Azure SAS": sas})
    assert os.environ.get("HF_TOKEN") != TOKEN  # the test never leaked it into its own environment either
