from hilo.cli.app import app

app()
