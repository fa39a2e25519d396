"""The README's test command is what CI runs, and a wheel carries the configs."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci_lines = [ln for ln in (ROOT / ".ci/run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert test_cmd.strip() in ci_lines
    assert "torch==2.13.0" in test_cmd and test_cmd.index("torch==2.13.0") < test_cmd.index("-e '.[dev]'")


def test_top_level_layout():
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True).stdout.split()
    top = {p.split("/")[0] for p in tracked}
    assert top <= {"conf", "recon", "tests", "mlruns", "pyproject.toml", "README.md", ".ci", ".gitignore", "docs"}
    assert [p for p in tracked if p.startswith("mlruns/")] == ["mlruns/.gitkeep"]


def test_wheel_contains_configs(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)], capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    wheel = next(tmp_path.glob("recon-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "recon/conf/config.yaml" in names
    assert "recon/conf/experiment/seed_blend.yaml" in names
    assert "recon/cli.py" in names
    # Installed from the wheel (unpacked, first on the path), recon finds the configs inside the package.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import recon.config as c; print(c.CONF_DIR)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == site / "recon" / "conf"
