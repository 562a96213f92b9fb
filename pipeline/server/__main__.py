from pipeline.server.app import main

main()
